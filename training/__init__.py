"""Training code beside the library and not installed with it: `python -m training.demo_model [--eval]`."""
