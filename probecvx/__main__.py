from probecvx.cli import main

main()
