from msgsnn.cli import main

main()
