from llmcli.cli import main

if __name__ == "__main__":  # not when a spawned tensor-parallel worker re-imports the main module
    main()
