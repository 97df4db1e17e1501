"""Everything that knows Ray: cluster connection, placement, worker and parameter-server actors, driver."""
