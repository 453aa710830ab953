"""The trainer, one module per job (imports run downwards):

==================  ====================================================================================
module              owns
==================  ====================================================================================
``state``           ``TrainState``, where each part lives on the mesh, initialisation, model size
``grads``           the one gradient routine: m workers, shared or own parameters, microsteps, norms
``step``            the train step: prepare -> gradients -> reduce -> apply -> non-finite guard -> metrics
``evaluation``      the eval step, evaluation over every example once, the consensus distance
``setup``           a run's layout, data, model, optimizer, strategy, writer; restore or initialise
``loop``            the training loop: log, evaluate, checkpoint, stop on a signal or a non-finite value
``results``         results.json
``train``           ``train_and_evaluate``: one run from config to results.json
==================  ====================================================================================

``state``, ``grads`` and ``step`` need only JAX and Flax (no TensorFlow, no config library), so that a
benchmark can build the real step on a machine with nothing else.
"""
