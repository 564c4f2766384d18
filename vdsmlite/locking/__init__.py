"""Cluster locking on shared storage: sanlock (binding, lease holder), domain
monitors that join lockspaces, fencing through storage, and the watchdog."""
