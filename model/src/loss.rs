//! Losses: ITC, ITM with hard negatives, MLM, bbox L1 + GIoU.
