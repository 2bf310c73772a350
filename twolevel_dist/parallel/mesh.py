"""Process-group setup: the 2-D ("dp", "gp") device mesh, gp innermost.

Consecutive ranks form one model-parallel (gp) group, so a group stays inside one node; the dp
dimension runs across groups.
"""

import os
import re
import shutil
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from twolevel_dist.errors import ConfigError, RankError
from twolevel_dist.validate import positive_int


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("node[03-05,7],gpu1" -> "node03")."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set "
                          f"MASTER_ADDR yourself")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def node_address(node: str) -> str:
    """The address SLURM itself reaches ``node`` at (its NodeAddr): a node's name resolves only
    where the cluster's DNS knows it. The name where SLURM does not say."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True)
        match = re.search(r"NodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
        if match:
            return match.group(1)
    return node


# A SLURM job's rendezvous port, from its id: jobs that share a node never share a port unless
# their ids are JOB_PORT_SPAN apart. 20000-29499 lies below Linux's ephemeral ports (32768-) and
# torchrun's default 29500. Used by the srun/submitit path and launch/slurm.sbatch alike.
JOB_PORT_BASE, JOB_PORT_SPAN = 20000, 9500


def job_port(job_id: int) -> int:
    return JOB_PORT_BASE + job_id % JOB_PORT_SPAN


def apply_slurm_env(environ=os.environ) -> None:
    """Without torchrun (one srun task per rank, e.g. submitit), derive torchrun's variables from
    SLURM's: RANK from SLURM_PROCID, WORLD_SIZE from SLURM_STEP_NUM_TASKS, LOCAL_RANK from
    SLURM_LOCALID, MASTER_ADDR from the first node of the allocation (its NodeAddr), MASTER_PORT
    from the job id.
    Under torchrun (RANK already set) nothing changes; nor in a batch script outside srun, where
    SLURM_NTASKS counts tasks that were never started (srun sets SLURM_STEP_NUM_TASKS)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or \
            "SLURM_STEP_NUM_TASKS" not in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_STEP_NUM_TASKS"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = node_address(
            first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    if "MASTER_PORT" not in environ:
        environ["MASTER_PORT"] = str(job_port(int(environ.get("SLURM_JOB_ID", "0"))))


def env_rank() -> int:
    apply_slurm_env()
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    apply_slurm_env()
    return int(os.environ.get("WORLD_SIZE", 1))


DEFAULT_TIMEOUT_S = 1800
DEFAULT_STARTUP_TIMEOUT_S = 60


DEVICES = ("auto", "cpu", "cuda")      # the ``device`` config key


def check_device(kind: str) -> None:
    """Refuse a ``device`` value other than auto, cpu and cuda."""
    if kind not in DEVICES:
        raise ConfigError(f"device={kind!r} is not one of {', '.join(DEVICES)} (auto: a GPU "
                          f"where CUDA is available, else the CPU; cpu: the CPU even where a "
                          f"GPU is; cuda: a GPU, required)")


def local_device(kind: str = "auto") -> torch.device:
    """This process's device, as ``kind`` (the ``device`` key) says: "auto", its GPU when CUDA
    is available, else the CPU; "cpu", the CPU even where a GPU is; "cuda", its GPU, refused
    where none is visible. torchrun and SLURM's ``--gpus-per-node`` show every local GPU to
    every rank (rank r takes GPU LOCAL_RANK); SLURM's ``--gpus-per-task`` (or a
    CUDA_VISIBLE_DEVICES per task) shows each rank only its own, which is then GPU 0 whatever
    LOCAL_RANK is."""
    check_device(kind)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible to this process (a CPU "
                          "build of torch, no driver, or CUDA_VISIBLE_DEVICES hides them); use "
                          "device=cpu or device=auto")
    visible, local_rank = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0))
    # torchrun (which sets LOCAL_WORLD_SIZE) shows every local rank the same GPUs.
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_ranks > visible:
        raise ConfigError(
            f"{local_ranks} ranks on this node (torchrun --nproc_per_node={local_ranks}) but "
            f"only {visible} GPU(s) visible, and NCCL cannot give two ranks one GPU: launch "
            f"--nproc_per_node={visible} (groups=N on one rank trains the single-device "
            f"model), or device=cpu for CPU ranks on gloo")
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this process sees only {visible} GPUs: launch at most "
            f"{visible} ranks per node (torchrun --nproc_per_node={visible}), or give each task "
            f"its own GPU (srun --gpus-per-task=1)")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The process-group backend(s) for ranks on ``device``. On GPUs NCCL carries the model's
    collectives and gloo serves any CPU tensor (as torchtitan does): NCCL alone takes CUDA
    tensors only, and a CPU scalar reduced on it fails."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S,
                     startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
                     device: str = "auto") -> torch.device:
    """Initialise torch.distributed from torchrun's environment (or SLURM's, see
    ``apply_slurm_env``) if it is not already, and return this rank's device (``local_device``
    of ``device``: on the CPU the backend is gloo alone).
    ``timeout_s`` bounds how long a rank waits for the others in one collective: a hung or
    crashed peer fails the job after that long instead of blocking it. ``startup_timeout_s``
    bounds the wait for rank 0's rendezvous store where this process group hosts it (no
    torchrun agent): a rank 0 that could not start ends the others that soon."""
    apply_slurm_env()
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if v not in os.environ]
        if missing:
            raise ConfigError(
                f"torch.distributed is not initialised and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun "
                f"(e.g. torchrun --standalone --nproc_per_node=4 ...) or srun under SLURM")
        _init_process_group(backend_for(device), timedelta(seconds=timeout_s),
                            timedelta(seconds=startup_timeout_s))
    return device


def _init_process_group(backend: str, timeout: timedelta, startup_timeout: timedelta) -> None:
    """``init_process_group`` over a store that holds only this restart round's keys.

    After torchrun restarts the workers (--max-restarts), a store shared between rounds still
    holds the previous round's keys, among them the dead ranks' gloo addresses: a new rank that
    reads one before its peer overwrites it connects to a closed port and fails. With the
    agent's shared store (one node: one agent, one restart count) a prefix per attempt keeps
    the rounds apart. Across nodes the restart count is not shared (an agent whose workers were
    stopped for another node's failure does not count a restart), so there the agents must give
    each round a store of its own, hosted by rank 0 (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which
    ``launch/slurm.sbatch`` sets); restarts without it are refused up front."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if agent_hosts_store and int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise ConfigError(
            "torchrun on several nodes with --max-restarts > 0 shares one rendezvous store "
            "between restart rounds, and a restart after one node's failure would read the "
            "previous round's keys; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun "
            "on every node (launch/slurm.sbatch does), or use --max-restarts=0")
    startup = timeout if agent_hosts_store else startup_timeout
    try:
        store = tcp_store = _rendezvous_store(rank, world, agent_hosts_store, startup)
        if agent_hosts_store:
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"twolevel/attempt_{attempt}", store)
        # Every rank present before the backend connects (which waits dist.timeout_s).
        store.set(f"twolevel/rank_{rank}", "up")
        store.wait([f"twolevel/rank_{r}" for r in range(world)], startup)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
    except (RuntimeError, OSError) as error:     # DistNetworkError, DistStoreError
        if not _timed_out(error):
            raise
        raise RankError(
            f"rank {rank} found no rank 0 of this job at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {startup.total_seconds():g} s "
            f"(dist.startup_timeout_s): rank 0 did not start (its own log says why), the "
            f"address is not reachable from here, or another job holds that port") from None
    tcp_store.set_timeout(timeout)    # later waits (subgroups, NCCL's first use) are the job's


def _timed_out(error: BaseException) -> bool:
    text = str(error).lower()
    return "timeout" in text or "timed out" in text or "connect" in text


def _rendezvous_store(rank: int, world: int, agent_hosts_store: bool,
                      timeout: timedelta) -> dist.TCPStore:
    """The TCP store at MASTER_ADDR:MASTER_PORT: hosted by rank 0 (or torchrun's agent), joined
    by the others within ``timeout``. A port rank 0 cannot bind is reported as that, naming it."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hosts = rank == 0 and not agent_hosts_store
    try:
        return dist.TCPStore(addr, port, world, is_master=hosts, timeout=timeout)
    except (RuntimeError, OSError) as error:     # DistNetworkError, DistStoreError
        text = str(error).lower()
        if hosts and ("address already in use" in text or "eaddrinuse" in text):
            raise ConfigError(
                f"port {port} on {addr} is already in use (another job on this node?), so rank "
                f"0 cannot host the rendezvous there; choose another with MASTER_PORT "
                f"(RDZV_PORT for launch/slurm.sbatch; without either, SLURM jobs take "
                f"{JOB_PORT_BASE} + job id % {JOB_PORT_SPAN})") from None
        raise


def init_mesh(groups: int, dp: int | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> DeviceMesh:
    """A ("dp", "gp") mesh with gp = ``groups`` ranks per model and dp = world // groups
    replicas. ``timeout_s`` bounds a wait in the mesh's collectives as ``init_distributed``'s
    bounds one in the world's: give both the same."""
    if not dist.is_initialized():
        raise ConfigError("init_mesh needs torch.distributed initialised first; call "
                          "twolevel_dist.parallel.init_distributed() (under torchrun)")
    world = dist.get_world_size()
    positive_int("groups", groups)
    if world % groups:
        raise ConfigError(
            f"the world size {world} is not a multiple of groups={groups}: each model needs "
            f"{groups} ranks (one per group); launch a multiple of {groups} processes or set "
            f"groups to a divisor of {world}")
    if dp is None:
        dp = world // groups
    if dp * groups != world:
        raise ConfigError(f"dp x groups = {dp} x {groups} = {dp * groups} does not equal the "
                          f"world size {world}; leave dp unset to use world // groups")
    # Plain gloo: CPU ranks. Any other backend ("cpu:gloo,cuda:nccl", "nccl", a CUDA-only gloo)
    # serves the GPUs, where the mesh's tensors live.
    device_type = "cpu" if dist.get_backend() == "gloo" else "cuda"
    mesh = init_device_mesh(device_type, (dp, groups), mesh_dim_names=("dp", "gp"))
    # DeviceMesh creates the groups of a dimension smaller than the world with torch's default
    # timeout (30 min, torch 2.11 to 2.13), not the world's: a hung peer in a gp or dp
    # collective would hold the job that long. Each group gets the job's (as torchtitan's
    # set_pg_timeouts does; the function is private, in torch since 2.2).
    for dim in ("dp", "gp"):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s),
                                              mesh[dim].get_group())
    return mesh


if __name__ == "__main__":          # launch/slurm.sbatch: the port of the job id given
    import sys
    print(job_port(int(sys.argv[1])))
