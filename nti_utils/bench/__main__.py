from nti_utils.bench.cli import main

main()
