"""The two SPEAD stream contracts of karoo: CBF correlator input and L0 visibility output."""
