"""The `demo` model of engine/demo_model: a small prompt-following stylizer the project trains on a CPU.

`python -m training.demo_model` trains it (`train`) and `--eval` measures a checkpoint (`evaluate`); the
styles it learns are classical image filters (`styles`) of the photographs inside scikit-image (`data`).
"""
