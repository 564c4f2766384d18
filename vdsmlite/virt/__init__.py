"""VMs: qemu processes driven over QMP, with disks from domains or direct LUNs.

* `definition`: the one internal VM definition (plain data);
* `domxml`, `legacy`: the two request forms the engine sends, parsed into it;
  `checks`: the rules both share; `requests`: which form a verb got;
* `qemu`: the qemu command line and process; `qmp`: the QMP session;
* `vm`, `manager`: VM lifecycle, hot plug, recovery after an agent restart.
"""
