"""XO for Ceph: cluster bring-up, the RGW front (host role), OSD-host agents (target role)."""
