from dwf.cli import main

main()
