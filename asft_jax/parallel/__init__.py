"""How a step is laid over devices and hosts: the device mesh and the logical-axis rules (``sharding``),
multi-process start-up and cross-host helpers (``distributed``), and the memory a step may use
(``memory``)."""
