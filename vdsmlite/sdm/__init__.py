"""Coordination: work that combines storage, locks, leases and jobs.

VDSM calls its lease-guarded storage work "SDM" (storage domain manager). Each
service here receives exactly what it uses (domains, the SDM lease, jobs,
image locks, the executor) from the composition root, `vdsmlite.services`,
and offers whole operations to the doors (`api/`, `http/`):

* `lease`: the domain's SDM lease, and the refusal when this host may not hold it;
* `volumes`: volume and image changes as jobs under the image lock and the lease;
* `provision`: creating, formatting and finding domains, VGs, the embedded local domain;
* `pools`: pool membership together with the domain monitors that follow it;
* `transfers`: any volume's bytes through VDSM's image door;
* `ovfstore`: the OVF_STORE commit protocol, reads, single-entity edits.
"""
