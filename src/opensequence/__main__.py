from opensequence.cli.main import main

main()
