"""Bad layouts fail with a sentence before any process group or model is built."""
import pytest
import torch.distributed as dist

from megatron_tanuki.models.tanuki.config import TANUKI_8B, TANUKI_8X8B, TANUKI_8X8B_TINY
from megatron_tanuki.runtime.distributed import LaunchEnv, LayoutError, ParallelLayout, init_distributed

CASES = [
    (16, ParallelLayout(tp=2, pp=2, ep=8, sp=True), TANUKI_8X8B, "not divisible by ETP*EP*PP = 2*8*2 = 32"),
    (6, ParallelLayout(tp=4), TANUKI_8B, "world size 6 is not divisible by TP*PP*CP = 4*1*1 = 4"),
    (8, ParallelLayout(tp=2, pp=3), TANUKI_8B, "world size 8 is not divisible by TP*PP*CP = 2*3*1 = 6"),
    (3, ParallelLayout(tp=3), TANUKI_8B, "32 attention heads are not divisible by TP=3"),
    (16, ParallelLayout(tp=16), TANUKI_8B, "8 KV heads (query groups) are not divisible by TP=16"),
    (3, ParallelLayout(ep=3), TANUKI_8X8B, "8 experts are not divisible by EP=3"),
    (6, ParallelLayout(pp=6), TANUKI_8B, "32 layers are not divisible into PP*VPP = 6 pipeline stages"),
    (4, ParallelLayout(pp=2, vpp=3), TANUKI_8X8B_TINY, "4 layers are not divisible into PP*VPP = 6"),
    (2, ParallelLayout(tp=2), TANUKI_8X8B, "MoE with TP=2 requires sequence parallel"),
    (2, ParallelLayout(ep=2), TANUKI_8B, "tanuki-8b is dense: expert parallel EP=2 needs a MoE model"),
    (1, ParallelLayout(sp=True), TANUKI_8B, "sequence parallel (sp) needs TP > 1"),
]


@pytest.mark.parametrize("world,layout,model,message", CASES)
def test_bad_layout_is_refused_with_its_reason(world, layout, model, message):
    with pytest.raises(LayoutError) as e:
        layout.validate(world, model)
    assert message in str(e.value)


def test_good_layouts_pass():
    ParallelLayout(tp=2, pp=2, ep=4, sp=True).validate(16, TANUKI_8X8B)
    ParallelLayout(tp=1, pp=2, ep=8).validate(16, TANUKI_8X8B)  # the Slurm default, 2 x 8 H100
    ParallelLayout(pp=2, vpp=2).validate(2, TANUKI_8X8B_TINY)


def test_init_distributed_validates_before_starting_anything():
    env = LaunchEnv(rank=0, world_size=3, local_rank=0, master_addr="127.0.0.1", master_port=1)
    was = dist.is_initialized()
    with pytest.raises(LayoutError, match="not divisible by TP"):
        init_distributed(ParallelLayout(tp=2), TANUKI_8B, env=env)  # port 1: would fail if reached
    assert dist.is_initialized() == was


def test_unknown_layout_field():
    with pytest.raises(LayoutError, match=r"unknown parallel layout field\(s\) \['dp'\]"):
        ParallelLayout.from_dict({"tp": 2, "dp": 4})


def test_launch_env_from_torchrun_and_slurm():
    tr = LaunchEnv.from_environ({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
                                 "MASTER_ADDR": "n0", "MASTER_PORT": "6000"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == (5, 16, 5, "n0", 6000)
    sl = LaunchEnv.from_environ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                 "SLURM_JOB_NODELIST": "gpu[03-04,07],cpu1", "SLURM_JOB_ID": "123"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.master_port) == (9, 16, 1, "gpu03", 29623)
    assert LaunchEnv.from_environ({}).world_size == 1


@pytest.mark.parametrize("nodelist,first", [
    ("h100-[07-08]", "h100-07"),
    ("gpu-a[01-02,05],gpu-b[10-11]", "gpu-a01"),  # several bracket groups, commas inside them
    ("node[1-2]-ib[3]", "node1-ib3"),  # two bracket groups in one host expression
    ("rack[1-2]-node[05-06],login1", "rack1-node05"),
    ("node[009-011,020]", "node009"),  # zero padding kept
    ("cpu1,gpu[03-04]", "cpu1"),
    ("single", "single"),
])
def test_master_addr_is_the_first_host_of_a_slurm_hostlist(nodelist, first):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": nodelist}
    assert LaunchEnv.from_environ(env).master_addr == first
    # the step's node list (srun) wins over the job's; an exported MASTER_ADDR (slurm/common.sh) wins over both
    assert LaunchEnv.from_environ({**env, "SLURM_STEP_NODELIST": "step[4-5]"}).master_addr == "step4"
    assert LaunchEnv.from_environ({**env, "MASTER_ADDR": "n9"}).master_addr == "n9"


@pytest.mark.parametrize("nodelist,message", [
    ("node[1-2", "SLURM_JOB_NODELIST='node[1-2': cannot read the bracket group at position 4"),
    ("node]1", "SLURM_JOB_NODELIST='node]1': ']' without '[' at position 4"),
    ("n[a-b]", "SLURM_JOB_NODELIST='n[a-b]': cannot read the bracket group at position 1"),
    (",x", "SLURM_JOB_NODELIST=',x': no host name before the first ','"),
])
def test_malformed_slurm_hostlist_is_a_named_error(nodelist, message):
    with pytest.raises(ValueError) as e:
        LaunchEnv.from_environ({"SLURM_JOB_NODELIST": nodelist})
    assert message in str(e.value)
