"""The stage entry points: one module per stage, each a ``main(run, *input_uris)`` that reads as the
paper's algorithm (load inputs, loop rollout -> score -> loss -> step, publish). ``stages/registry.py``
names which module runs which stage; everything they use lives in the library one level up."""
