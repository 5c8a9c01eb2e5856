"""stub"""

def check(ctx, names):
    pass
