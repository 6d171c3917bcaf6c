"""What the Flower apps share without importing each other or Flower itself.

`contract`: the round contract (round spec, weight-set wire encoding, metric keys, error codes).
`processes` / `launcher`: starting and stopping Flower's processes (SuperLink, SuperNode, `flwr run`).
The ServerApp (`server/`) and the ClientApp (`client/`) both import this package; it imports no Flower.
"""
