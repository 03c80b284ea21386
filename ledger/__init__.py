"""tokenmill.ledger"""
