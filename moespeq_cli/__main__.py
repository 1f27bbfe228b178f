from moespeq_cli.entry import main

main()
