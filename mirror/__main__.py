from mirror.commands.main import main

raise SystemExit(main())
