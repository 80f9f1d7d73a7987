"""The serving-engine rule data, one module per engine (its rule sets, one per engine version, with the engine
source each rule comes from)."""
