"""The mechanics behind rlopt's controlled optimizers, one concern per module:

* :mod:`~rlopt.control.base`: :class:`ControlledOptimizer`, the ``torch.optim.Optimizer`` that
  composes the rest;
* :mod:`~rlopt.control.choices`: the inner optimizer families and how hyper-parameters combine;
* :mod:`~rlopt.control.inner`: the inner optimizers, kept in step with the wrapper's groups;
* :mod:`~rlopt.control.guarded`: steps checked for non-finite values on the device;
* :mod:`~rlopt.control.signals`: the device-side signal tracker;
* :mod:`~rlopt.control.observation`: signals turned into the policy's observation;
* :mod:`~rlopt.control.controller`: progress, budget and decisions;
* :mod:`~rlopt.control.checkpoint`: the checkpoint's checks and its all-or-nothing load;
* :mod:`~rlopt.control.resolve`: the ``policy=`` argument;
* :mod:`~rlopt.control.distributed`: data-parallel ranks deciding together;
* :mod:`~rlopt.control.validation`: argument checks;
* :mod:`~rlopt.control.torch_compat`: every private torch API rlopt uses, with fallbacks.
"""
