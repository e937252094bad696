from tickettune.cli import main

raise SystemExit(main())
