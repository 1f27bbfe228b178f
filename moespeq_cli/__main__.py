from moespeq_cli.cli.app import main

main()
