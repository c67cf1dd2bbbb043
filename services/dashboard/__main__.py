import sys

from services.dashboard import main

sys.exit(main())
