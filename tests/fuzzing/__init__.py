"""Mutation fuzzer for onnxopt (issue 16): seeds.py (tiny valid models), mutate.py (seeded mutators
over models and calibration data), harness.py (lays cases out, drives a worker process, counts),
worker.py (runs onnxopt as users do and classifies the result). tests/test_fuzz.py is the short CI
run, benchmarks/fuzz.py the long one."""
