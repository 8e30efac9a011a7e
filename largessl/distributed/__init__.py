"""How training is spread over processes: the only package that imports deepspeed (engine.py, and ops.py for its
JIT-built ops)."""
