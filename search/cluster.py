"""Where trial drivers run and whether storage is reachable from every node."""

from __future__ import annotations

DRIVER_RESOURCE = "TRAIN_DRIVER"  # custom resource of the nodes meant to host trial drivers (cluster/*.yaml)


def driver_resources(cluster: dict) -> dict:
    """Resources of one Tune trial's driver (it only builds a TorchTrainer and waits).

    On a cluster that declares TRAIN_DRIVER (a CPU head), drivers go there and take no CPU from
    the training nodes; on one machine a driver takes half a CPU, so a 2-core box runs one
    trial (driver + one Train worker) at a time.
    """
    if cluster.get(DRIVER_RESOURCE):
        return {"CPU": 0, DRIVER_RESOURCE: 0.01}
    return {"CPU": 0.5}


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_storage(storage: str, cluster: dict, shared: bool = False) -> None:
    """Refuse a head-local storage path when the cluster has other nodes (RAY.md §1.5).

    Train workers on other nodes write checkpoints to the same storage path; a folder on the
    head is not theirs. ``shared=True`` states that the path is a shared mount (NFS) on every node.
    """
    from trainables.data.storage import is_remote

    if is_remote(storage) or shared:
        return
    nodes = alive_nodes()
    if len(nodes) > 1:
        raise ValueError(f"--storage {storage} is a local folder, but the cluster has {len(nodes)} nodes and "
                         f"Train workers on the others cannot write to it. Use s3://bucket/prefix (or another "
                         f"object store), or a filesystem mounted at the same path on every node together "
                         f"with --shared-storage.")
