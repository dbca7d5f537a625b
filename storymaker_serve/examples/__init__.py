"""The example story and its photos, shipped with the package: `STORY` (two characters, three frames: a clothing
swap and a pose-guided one) and `DATA` (reference photos with character masks and face info, a clothing image, a
two-person photo with a colour-coded mask and its pose map). `make demo` and the tests use them."""
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
STORY = Path(__file__).resolve().parent / "demo_story.yaml"
