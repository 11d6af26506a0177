from xmr.cli.app import main

main()
