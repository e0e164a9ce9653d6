from kacli.cli import main

main()
