"""GPU supply: reserved nodes, and on-demand nodes bought when a replica finds no free GPU.

Replicas take their GPUs from one node (`fleet.gpus_per_node` divides into whole replicas, so
nodes never fragment) and queue in FIFO order when none has room. Reserved nodes (the
`gpu_capacity`) are always there; without `gpus_per_node` they are one pool. With
`fleet.on_demand`, a replica that has to wait asks for as many nodes as the waiting replicas
need (beyond nodes already on their way), up to `max_nodes`; a node serves after a
`provision_s` draw and is handed back as soon as no replica holds a GPU on it. Replicas are
placed on reserved nodes first, so on-demand nodes empty out.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import simpy

from rollout.capacity import replicas_fitting
from rollout.scenario import FleetSpec
from sim.coldstart import ColdStart
from sim.replica import Replica


class Node:
    __slots__ = ("gpus", "index", "on_demand", "up", "used")

    def __init__(self, index: int, gpus: int, *, on_demand: bool = False, up: bool = True) -> None:
        self.index = index  # in order of creation
        self.gpus = gpus
        self.used = 0
        self.on_demand = on_demand
        self.up = up  # an on-demand node is not up while it is being provisioned


class GpuSupply:
    def __init__(
        self,
        env: simpy.Environment,
        fleet: FleetSpec,
        provision: ColdStart | None,
        *,
        on_grant: Callable[[list[Replica]], None],
        on_change: Callable[[], None],
    ) -> None:
        self.env = env
        self.per_replica = fleet.gpus_per_replica
        per_node = fleet.gpus_per_node or fleet.gpu_capacity
        count = fleet.gpu_capacity // per_node if per_node else 0
        self.reserved = [Node(i, per_node) for i in range(count)]
        self.nodes_made = count
        self.per_node = fleet.gpus_per_node or 0
        self.on_demand_spec = fleet.on_demand
        self.provision = provision
        self.on_demand: list[Node] = []  # provisioning or up; each is billed
        self.waiting: deque[Replica] = deque()
        self.in_use = 0
        self.on_demand_in_use = 0
        self.on_grant = on_grant
        self.on_change = on_change

    @property
    def max_replicas(self) -> int | None:
        """Replicas the pool can ever hold: every reserved node and every on-demand node it may
        buy (None when a replica needs no GPU). The controller caps the pool with it."""
        fit = replicas_fitting
        if self.per_replica <= 0:
            return None
        n = sum(fit(node.gpus, self.per_replica) or 0 for node in self.reserved)
        if self.on_demand_spec is not None:
            n += self.on_demand_spec.max_nodes * (fit(self.per_node, self.per_replica) or 0)
        return n

    @property
    def on_demand_nodes(self) -> int:
        return len(self.on_demand)

    def request(self, rep: Replica) -> bool:
        """Take GPUs for rep now (True), or queue it (False) and buy nodes if allowed."""
        if not self.waiting and self._place(rep):
            return True
        self.waiting.append(rep)
        self._provision()
        return False

    def cancel(self, rep: Replica) -> None:
        self.waiting.remove(rep)

    def release(self, rep: Replica) -> None:
        """rep gives its GPUs back: waiting replicas get them, an emptied on-demand node goes."""
        node = rep.node
        rep.node = None
        if node is None:
            return
        assert isinstance(node, Node)
        node.used -= self.per_replica
        self.in_use -= self.per_replica
        if node.on_demand:
            self.on_demand_in_use -= self.per_replica
        self._grant()
        if node.on_demand and node.used == 0:
            self.on_demand.remove(node)

    def _place(self, rep: Replica) -> bool:
        need = self.per_replica
        for node in self.reserved:
            if node.used + need <= node.gpus:
                break
        else:
            for node in self.on_demand:
                if node.up and node.used + need <= node.gpus:
                    break
            else:
                return need == 0
        node.used += need
        self.in_use += need
        if node.on_demand:
            self.on_demand_in_use += need
        rep.node = node
        return True

    def _grant(self) -> None:
        granted = []
        while self.waiting and self._place(self.waiting[0]):
            granted.append(self.waiting.popleft())
        if granted:
            self.on_grant(granted)

    def _provision(self) -> None:
        spec = self.on_demand_spec
        if spec is None or self.provision is None:
            return
        coming = sum(n.gpus - n.used for n in self.on_demand if not n.up)
        short = self.per_replica * len(self.waiting) - coming
        nodes = min(math.ceil(short / self.per_node), spec.max_nodes - len(self.on_demand))
        for _ in range(max(0, nodes)):
            node = Node(self.nodes_made, self.per_node, on_demand=True, up=False)
            self.nodes_made += 1
            self.on_demand.append(node)
            ev = self.env.timeout(self.provision.sample())
            ev.callbacks.append(lambda _, node=node: self._node_up(node))
        if nodes > 0:
            self.on_change()

    def _node_up(self, node: Node) -> None:
        node.up = True
        self._grant()
        if node.used == 0:
            self.on_demand.remove(node)  # nobody needs it any more
        self.on_change()
