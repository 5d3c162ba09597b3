from phiconvert.cli import main

main()
