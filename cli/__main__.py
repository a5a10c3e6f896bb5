from kdcache.cli.main import main

main()
