from occdistill.cli.main import main

raise SystemExit(main())
