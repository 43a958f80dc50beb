from refseg.backbones.tiny_synth.cli import main

main()
