"""The npctalk demo: a pygame village whose three NPCs talk through ``npctalk serve`` over ZeroMQ.

Installed as ``npctalk.demo`` (the ``demo`` extra brings pygame); run it with ``npctalk-demo`` or, from
a source checkout, ``python -m demo_game``. Nothing in the npctalk runtime imports this package.
"""
