from refseg.extract.cli import main

main()
