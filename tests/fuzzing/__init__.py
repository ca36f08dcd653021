"""Mutation fuzzer for onnxopt (issue 16).

seeds.py               tiny valid models (Conv/MatMul/Add/Relu, external data, an If body)
context.py             the sentinel and the context every mutator gets (rng, case folder, files)
protowalk.py           walks over a ModelProto
model_mutators.py      fields, dims, dtypes, raw_data, names, nodes, attributes, opsets, bytes
external_mutators.py   external-data locations, links, offsets, lengths
calibration_mutators.py  calibration arrays, API feeds, .npz files
mutate.py              a case = seed + mutations + mode (random by (seed, index), or targeted)
harness.py             lays a case out on disk, drives the worker process, counts verdicts
worker.py              runs onnxopt as users do and classifies what happened

tests/test_fuzz.py is the short CI run, benchmarks/fuzz.py the long one.
"""
