"""`vigu` under Accelerate's FSDP on CPU processes (gloo), for test_train.py: Accelerate keeps FSDP for accelerators
(on CPU its state says MULTI_CPU and ignores the FSDP plugin), although torch's FSDP2 runs over gloo. This lifts that
one decision, then runs the command line as `-m vigu_cli` would: everything after it is Accelerate's and vigu's own."""

import accelerate.state
from accelerate.utils import DistributedType

accelerator_state_init = accelerate.state.AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


accelerate.state.AcceleratorState.__init__ = init_with_fsdp_on_cpu

if __name__ == "__main__":
    from vigu_cli.cli import main

    main()
