"""``python -m densenet_fast [bench|train|max-depth]``; with no command, the README's main job."""
import sys

from .cli import main

sys.exit(main())
