"""Arrow tables cross the object store as one IPC buffer: exact round trips through real actors."""
import pyarrow as pa
import ray

from rlaif_ray.data import schemas
from rlaif_ray.data.transport import table_from_ipc, table_to_ipc, use_arrow_ipc


def rollouts(n: int) -> pa.Table:
    return pa.Table.from_pydict({
        "sample_id": [f"s/{i}" for i in range(n)], "prompt_id": ["p"] * n, "group_index": list(range(n)),
        "prompt": ["1+2="] * n, "prompt_token_ids": [[1, 5, 6]] * n, "response": [" 3", None][: 1] * n,
        "response_token_ids": [[7, 2]] * n, "response_logprobs": [[-0.1, -2.5]] * n,
        "finish_reason": ["stop"] * n, "policy_version": [3] * n, "token_versions": [[3, 4]] * n,
        "reference": [None] * n,
    }, schema=schemas.ROLLOUT_SCHEMA)


@ray.remote(num_cpus=0)
class Hop:
    def __init__(self, register: bool):
        self.name = "registered" if register else "default"
        if register:
            use_arrow_ipc()

    def forward(self, table: pa.Table) -> pa.Table:
        return table.append_column(self.name, pa.array([1] * table.num_rows, pa.int8()))


def test_ipc_round_trip_is_exact():
    table = rollouts(5)
    back = table_from_ipc(table_to_ipc(table))
    assert back.equals(table) and back.schema == table.schema


def test_tables_pass_through_registered_and_unregistered_actors(ray_cluster):
    use_arrow_ipc()
    use_arrow_ipc()  # idempotent
    table = rollouts(32)
    sender, receiver = Hop.remote(True), Hop.remote(False)
    out = ray.get(receiver.forward.remote(sender.forward.remote(ray.put(table))))
    assert out.column_names[-2:] == ["registered", "default"]
    assert out.drop_columns(["registered", "default"]).equals(table)
    schemas.validate(out.drop_columns(["registered", "default"]), "rollouts")
    for actor in (sender, receiver):
        ray.kill(actor)
