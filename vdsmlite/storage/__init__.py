"""Storage: devices, connections, LVM, domains, images and volumes.

Most modules here block (disk I/O, LVM and other commands) and are run in the
daemon's bounded executor so the event loop never blocks. The exceptions are
async and say so in their docstrings: the streams (`streamio`, `volumestream`)
and the command runners that must time out (`commands`, `mount`, `iscsi`,
`connections`).
"""
