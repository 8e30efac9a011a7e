"""How training is spread over processes. engine.py is the only module that imports deepspeed."""
