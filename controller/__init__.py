"""The fairsynergy controller: learn every agent's utility, share the pool fairly.

The controller runs one loop, and each step has its own module:

- :mod:`controller.ingest`: validate telemetry and status from the broker;
- :mod:`controller.learn`: refit each agent's Cobb-Douglas utility online;
- :mod:`controller.allocate`: solve the alpha-fair allocation exactly;
- :mod:`controller.publish`: send allocations without over-committing the pool;
- :mod:`controller.store`: keep state in SQLite across restarts.

It needs the controller install: ``pip install 'fairsynergy[controller]'``.
"""
