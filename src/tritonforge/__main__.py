from tritonforge.cli import main

main()
