"""The dashboard (`rollout ui`) and its `/metrics` endpoint. Nothing else in the project imports
this package; everything it reads or sends goes through `ui/source.py`."""
