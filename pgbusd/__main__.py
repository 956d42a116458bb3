from pgbusd.cli import main

main()
