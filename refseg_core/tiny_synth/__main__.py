from refseg_core.tiny_synth.cli import main

main()
