// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Ownable2Step} from "@openzeppelin/contracts/access/Ownable2Step.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title IPSX Centralizer: wallets and micropayment channels of the IP Sharing Exchange
/// @notice The whitepaper's "Centralizer" contract. Every wallet has a `balance` (tokens
/// free to use) and a `reserved` amount (tokens locked in payment channels).
///
/// Channels are unidirectional (micro-Raiden style), requester -> provider. The requester
/// locks tokens from its `balance` into the channel and signs off-chain EIP-712 balance
/// proofs `BalanceProof(bytes32 channelId,uint256 cumulativeAmount)`; the provider
/// redeems the latest one with `claim` whenever it likes. Closing:
/// - the provider closes with `claim(..., close = true)`;
/// - the requester closes at once with the provider's signed `CloseConsent`
///   (`cooperativeClose`);
/// - otherwise the requester calls `startClose`, paying what it admits owing; during the
///   challenge period the provider can still `claim` with a newer proof; then anyone
///   calls `settle`, which refunds the unspent deposit to the requester.
///
/// A platform fee (basis points, capped by `MAX_FEE_BPS`) of every amount paid to a
/// provider is credited to the treasury's `balance`. Every payment and close event
/// carries `logHash`, the head of the provider's connection-log hash chain, so the
/// connection log of each deal is committed on chain.
///
/// Invariant: the sum over all wallets of `balance + reserved` equals the token balance
/// of this contract (tokens sent to it outside `deposit` are not accounted and stay
/// stuck). For each requester, `reserved` equals the sum of `deposit - claimed` over its
/// open channels.
contract Centralizer is EIP712, Ownable2Step, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    /// @notice EIP-712 type hash of the requester's balance proof.
    bytes32 public constant BALANCE_PROOF_TYPEHASH =
        keccak256("BalanceProof(bytes32 channelId,uint256 cumulativeAmount)");
    /// @notice EIP-712 type hash of the provider's consent to an immediate close.
    bytes32 public constant CLOSE_CONSENT_TYPEHASH =
        keccak256("CloseConsent(bytes32 channelId,uint256 cumulativeAmount,bytes32 logHash)");
    /// @notice Hard cap of the platform fee: 10 %.
    uint16 public constant MAX_FEE_BPS = 1000;
    /// @notice Longest challenge period the constructor accepts.
    uint64 public constant MAX_CHALLENGE_PERIOD = 30 days;

    /// @notice A payment channel. `settleAfter` is 0 while the channel is open, else the
    /// timestamp from which `settle` is allowed. `logHash` is the last one the provider
    /// submitted with a non-closing claim.
    struct Channel {
        address requester;
        uint64 settleAfter;
        address provider;
        uint128 deposit;
        uint128 claimed;
        bytes32 logHash;
    }

    /// @notice The IPSX token held by this contract.
    IERC20 public immutable token;
    /// @notice Seconds between `startClose` and the earliest `settle`.
    uint64 public immutable challengePeriod;

    /// @notice Tokens of a wallet free to use (withdraw, open or top up channels).
    mapping(address wallet => uint256) public balance;
    /// @notice Tokens of a wallet locked in its open channels.
    mapping(address wallet => uint256) public reserved;

    /// @notice Wallet credited with the platform fee.
    address public treasury;
    /// @notice Platform fee in basis points of every amount paid to a provider.
    uint16 public feeBps;
    /// @notice Number of channels ever opened; part of the next channel id.
    uint256 public channelNonce;

    mapping(bytes32 channelId => Channel) private _channels;

    /// @notice `wallet` moved `amount` tokens into its `balance`.
    event Deposited(address indexed wallet, uint256 amount);
    /// @notice `wallet` took `amount` tokens out of its `balance`.
    event Withdrawn(address indexed wallet, uint256 amount);
    /// @notice A channel was opened with `deposit` tokens moved to `reserved`.
    event ChannelOpened(
        bytes32 indexed channelId, address indexed requester, address indexed provider, uint256 deposit
    );
    /// @notice The requester added `amount`; the channel now holds `deposit`.
    event ChannelToppedUp(bytes32 indexed channelId, uint256 amount, uint256 deposit);
    /// @notice The provider was paid `paid` (of which `fee` went to the treasury), bringing
    /// the channel's cumulative payment to `cumulativeAmount`.
    event ChannelClaimed(
        bytes32 indexed channelId,
        address indexed provider,
        uint256 cumulativeAmount,
        uint256 paid,
        uint256 fee,
        bytes32 logHash
    );
    /// @notice The requester started an uncooperative close, admitting `cumulativeAmount`.
    event ChannelCloseRequested(bytes32 indexed channelId, uint256 cumulativeAmount, uint64 settleAfter);
    /// @notice The channel is gone: `claimed` went to the provider over its life, `refund`
    /// back to the requester's `balance`.
    event ChannelClosed(
        bytes32 indexed channelId,
        address indexed requester,
        address indexed provider,
        uint256 claimed,
        uint256 refund,
        bytes32 logHash
    );
    /// @notice The platform fee changed.
    event FeeChanged(uint16 feeBps);
    /// @notice The treasury changed.
    event TreasuryChanged(address treasury);

    /// @notice A zero amount was given where a positive one is needed.
    error ZeroAmount();
    /// @notice A constructor or setter argument named `field` was invalid.
    error InvalidParameter(string field);
    /// @notice `wallet` has `available` in `balance` but `requested` was needed.
    error InsufficientBalance(address wallet, uint256 available, uint256 requested);
    /// @notice The permit did not leave an allowance of `amount` for this contract.
    error PermitFailed(address owner, uint256 amount);
    /// @notice The provider is zero or the requester itself.
    error InvalidProvider(address provider);
    /// @notice No open or closing channel has this id.
    error ChannelNotFound(bytes32 channelId);
    /// @notice Only the channel's requester may do this.
    error NotRequester(bytes32 channelId, address caller);
    /// @notice Only the channel's provider may do this.
    error NotProvider(bytes32 channelId, address caller);
    /// @notice The channel is closing (no top-up, no second close).
    error ChannelClosing(bytes32 channelId, uint64 settleAfter);
    /// @notice `settle` on a channel whose close was not started.
    error ChannelNotClosing(bytes32 channelId);
    /// @notice `settle` before the end of the challenge period.
    error ChallengePeriodActive(bytes32 channelId, uint64 settleAfter);
    /// @notice A claim after the end of the challenge period.
    error ChallengePeriodOver(bytes32 channelId, uint64 settleAfter);
    /// @notice The proof's amount is not above what was already claimed.
    error StaleProof(bytes32 channelId, uint256 claimed, uint256 cumulativeAmount);
    /// @notice The proof's amount is above the channel's deposit.
    error ClaimExceedsDeposit(bytes32 channelId, uint256 deposit, uint256 cumulativeAmount);
    /// @notice The signature is malformed (length, high s, bad v): `reason` is OpenZeppelin's
    /// `ECDSA.RecoverError` code (1 invalid, 2 bad length, 3 high s).
    error MalformedSignature(bytes32 channelId, uint8 reason);
    /// @notice The signature is valid but by `recovered`, not by `expected`.
    error WrongSigner(bytes32 channelId, address expected, address recovered);
    /// @notice An amount does not fit the channel's 128-bit accounting.
    error AmountTooLarge(uint256 amount);

    /// @param token_ the IPSX token (any ERC20 without transfer fees)
    /// @param owner_ may change the fee (within `MAX_FEE_BPS`) and the treasury
    /// @param treasury_ wallet credited with the platform fee
    /// @param feeBps_ initial platform fee in basis points
    /// @param challengePeriod_ seconds between `startClose` and `settle` (1 s to 30 days)
    constructor(IERC20 token_, address owner_, address treasury_, uint16 feeBps_, uint64 challengePeriod_)
        EIP712("IPSX Centralizer", "1")
        Ownable(owner_)
    {
        if (address(token_).code.length == 0) revert InvalidParameter("token");
        if (treasury_ == address(0)) revert InvalidParameter("treasury");
        if (feeBps_ > MAX_FEE_BPS) revert InvalidParameter("feeBps");
        if (challengePeriod_ == 0 || challengePeriod_ > MAX_CHALLENGE_PERIOD) {
            revert InvalidParameter("challengePeriod");
        }
        token = token_;
        treasury = treasury_;
        feeBps = feeBps_;
        challengePeriod = challengePeriod_;
        emit TreasuryChanged(treasury_);
        emit FeeChanged(feeBps_);
    }

    // ---------------------------------------------------------------- wallet

    /// @notice Moves `amount` tokens from the caller (after an ERC20 `approve`) into its
    /// `balance`.
    function deposit(uint256 amount) external nonReentrant {
        _deposit(amount);
    }

    /// @notice Same as `deposit`, authorised by an EIP-2612 permit instead of `approve`.
    /// A permit that was front-run (already used) still works if the allowance is there.
    function depositWithPermit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
    {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {}
        catch {}
        if (token.allowance(msg.sender, address(this)) < amount) revert PermitFailed(msg.sender, amount);
        _deposit(amount);
    }

    /// @notice Sends `amount` tokens from the caller's `balance` back to the caller.
    function withdraw(uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        uint256 available = balance[msg.sender];
        if (available < amount) revert InsufficientBalance(msg.sender, available, amount);
        unchecked {
            balance[msg.sender] = available - amount;
        }
        emit Withdrawn(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    // -------------------------------------------------------------- channels

    /// @notice Opens a channel to `provider`, moving `amount` of the caller's `balance` to
    /// `reserved`. Returns the new channel id (also in `ChannelOpened`).
    function openChannel(address provider, uint256 amount) external nonReentrant returns (bytes32 channelId) {
        if (provider == address(0) || provider == msg.sender) revert InvalidProvider(provider);
        if (amount == 0) revert ZeroAmount();
        uint128 amount128 = _toUint128(amount);
        _reserve(msg.sender, amount);
        uint256 nonce = channelNonce++;
        channelId = channelIdFor(msg.sender, provider, nonce);
        // Field by field: the zero fields (settleAfter, claimed, logHash) cost no write.
        Channel storage ch = _channels[channelId];
        ch.requester = msg.sender;
        ch.provider = provider;
        ch.deposit = amount128;
        emit ChannelOpened(channelId, msg.sender, provider, amount);
    }

    /// @notice Adds `amount` of the requester's `balance` to an open channel.
    function topUp(bytes32 channelId, uint256 amount) external nonReentrant {
        Channel storage ch = _existing(channelId);
        if (msg.sender != ch.requester) revert NotRequester(channelId, msg.sender);
        if (ch.settleAfter != 0) revert ChannelClosing(channelId, ch.settleAfter);
        if (amount == 0) revert ZeroAmount();
        uint128 newDeposit = _toUint128(uint256(ch.deposit) + amount);
        _reserve(msg.sender, amount);
        ch.deposit = newDeposit;
        emit ChannelToppedUp(channelId, amount, newDeposit);
    }

    /// @notice The provider redeems the requester's balance proof for `cumulativeAmount`
    /// (the total owed since the channel opened). Pays the difference with what was
    /// already claimed, minus the platform fee. With `close`, the channel is closed and the
    /// unspent deposit goes back to the requester's `balance`; without it, the proof must
    /// be newer (strictly larger) than the last claim. Allowed while the channel is
    /// closing, until the end of the challenge period.
    function claim(bytes32 channelId, uint256 cumulativeAmount, bytes calldata signature, bytes32 logHash, bool close)
        external
        nonReentrant
    {
        Channel storage ch = _existing(channelId);
        if (msg.sender != ch.provider) revert NotProvider(channelId, msg.sender);
        uint64 settleAfter = ch.settleAfter;
        if (settleAfter != 0 && block.timestamp >= settleAfter) revert ChallengePeriodOver(channelId, settleAfter);
        _checkSigner(channelId, balanceProofDigest(channelId, cumulativeAmount), signature, ch.requester);
        _pay(channelId, ch, cumulativeAmount, logHash, !close);
        if (close) {
            _close(channelId, ch, logHash);
        } else {
            ch.logHash = logHash;
        }
    }

    /// @notice The requester closes the channel at once with the provider's EIP-712
    /// `CloseConsent(channelId, cumulativeAmount, logHash)`: the provider gets
    /// `cumulativeAmount` in total, the requester the rest of the deposit.
    function cooperativeClose(
        bytes32 channelId,
        uint256 cumulativeAmount,
        bytes32 logHash,
        bytes calldata providerSignature
    ) external nonReentrant {
        Channel storage ch = _existing(channelId);
        if (msg.sender != ch.requester) revert NotRequester(channelId, msg.sender);
        _checkSigner(
            channelId, closeConsentDigest(channelId, cumulativeAmount, logHash), providerSignature, ch.provider
        );
        _pay(channelId, ch, cumulativeAmount, logHash, false);
        _close(channelId, ch, logHash);
    }

    /// @notice The requester starts an uncooperative close, paying the provider up to
    /// `cumulativeAmount` (what it admits owing; at least what was already claimed). The
    /// provider may still `claim` a newer proof until `settleAfter`.
    function startClose(bytes32 channelId, uint256 cumulativeAmount) external nonReentrant {
        Channel storage ch = _existing(channelId);
        if (msg.sender != ch.requester) revert NotRequester(channelId, msg.sender);
        if (ch.settleAfter != 0) revert ChannelClosing(channelId, ch.settleAfter);
        _pay(channelId, ch, cumulativeAmount, ch.logHash, false);
        uint64 settleAfter = uint64(block.timestamp) + challengePeriod;
        ch.settleAfter = settleAfter;
        emit ChannelCloseRequested(channelId, cumulativeAmount, settleAfter);
    }

    /// @notice After the challenge period, closes the channel: the unspent deposit goes
    /// back to the requester's `balance`. Anyone may call it.
    function settle(bytes32 channelId) external nonReentrant {
        Channel storage ch = _existing(channelId);
        uint64 settleAfter = ch.settleAfter;
        if (settleAfter == 0) revert ChannelNotClosing(channelId);
        if (block.timestamp < settleAfter) revert ChallengePeriodActive(channelId, settleAfter);
        _close(channelId, ch, ch.logHash);
    }

    // ----------------------------------------------------------------- owner

    /// @notice Sets the platform fee (at most `MAX_FEE_BPS`).
    function setFee(uint16 feeBps_) external onlyOwner {
        if (feeBps_ > MAX_FEE_BPS) revert InvalidParameter("feeBps");
        feeBps = feeBps_;
        emit FeeChanged(feeBps_);
    }

    /// @notice Sets the wallet credited with future fees (fees already credited stay).
    function setTreasury(address treasury_) external onlyOwner {
        if (treasury_ == address(0)) revert InvalidParameter("treasury");
        treasury = treasury_;
        emit TreasuryChanged(treasury_);
    }

    // ----------------------------------------------------------------- views

    /// @notice The channel `channelId`; all fields zero if it does not exist (any more).
    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    /// @notice The id of the channel opened by `requester` to `provider` as the
    /// `nonce`-th channel of this contract.
    function channelIdFor(address requester, address provider, uint256 nonce) public view returns (bytes32) {
        return keccak256(abi.encode(block.chainid, address(this), requester, provider, nonce));
    }

    /// @notice The EIP-712 digest the requester signs for a balance proof.
    function balanceProofDigest(bytes32 channelId, uint256 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(BALANCE_PROOF_TYPEHASH, channelId, cumulativeAmount)));
    }

    /// @notice The EIP-712 digest the provider signs to consent to a cooperative close.
    function closeConsentDigest(bytes32 channelId, uint256 cumulativeAmount, bytes32 logHash)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(CLOSE_CONSENT_TYPEHASH, channelId, cumulativeAmount, logHash)));
    }

    /// @notice The EIP-712 domain separator (name "IPSX Centralizer", version "1", this
    /// chain id, this contract).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // -------------------------------------------------------------- internal

    function _deposit(uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        token.safeTransferFrom(msg.sender, address(this), amount);
        balance[msg.sender] += amount;
        emit Deposited(msg.sender, amount);
    }

    function _reserve(address wallet, uint256 amount) private {
        uint256 available = balance[wallet];
        if (available < amount) revert InsufficientBalance(wallet, available, amount);
        unchecked {
            balance[wallet] = available - amount;
        }
        reserved[wallet] += amount;
    }

    function _existing(bytes32 channelId) private view returns (Channel storage ch) {
        ch = _channels[channelId];
        if (ch.requester == address(0)) revert ChannelNotFound(channelId);
    }

    function _checkSigner(bytes32 channelId, bytes32 digest, bytes calldata signature, address expected)
        private
        pure
    {
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, signature);
        if (err != ECDSA.RecoverError.NoError) revert MalformedSignature(channelId, uint8(err));
        if (recovered != expected) revert WrongSigner(channelId, expected, recovered);
    }

    /// Raises the channel's cumulative payment to `cumulativeAmount`: the difference moves
    /// from the requester's `reserved` to the provider's and the treasury's `balance`.
    function _pay(
        bytes32 channelId,
        Channel storage ch,
        uint256 cumulativeAmount,
        bytes32 logHash,
        bool mustIncrease
    ) private {
        uint256 claimed = ch.claimed;
        uint256 deposited = ch.deposit;
        if (cumulativeAmount < claimed || (mustIncrease && cumulativeAmount == claimed)) {
            revert StaleProof(channelId, claimed, cumulativeAmount);
        }
        if (cumulativeAmount > deposited) revert ClaimExceedsDeposit(channelId, deposited, cumulativeAmount);
        uint256 paid = cumulativeAmount - claimed;
        if (paid == 0) return;
        address provider = ch.provider;
        // Fee rounds down: the provider never gets less than `paid * (1 - fee)`.
        uint256 fee = (paid * feeBps) / 10_000;
        ch.claimed = uint128(cumulativeAmount); // <= deposit, which fits 128 bits
        reserved[ch.requester] -= paid;
        balance[provider] += paid - fee;
        if (fee != 0) balance[treasury] += fee;
        emit ChannelClaimed(channelId, provider, cumulativeAmount, paid, fee, logHash);
    }

    /// Deletes the channel and refunds its unspent deposit to the requester's `balance`.
    function _close(bytes32 channelId, Channel storage ch, bytes32 logHash) private {
        address requester = ch.requester;
        address provider = ch.provider;
        uint256 claimed = ch.claimed;
        uint256 refund = uint256(ch.deposit) - claimed;
        delete _channels[channelId];
        if (refund != 0) {
            reserved[requester] -= refund;
            balance[requester] += refund;
        }
        emit ChannelClosed(channelId, requester, provider, claimed, refund, logHash);
    }

    function _toUint128(uint256 amount) private pure returns (uint128) {
        if (amount > type(uint128).max) revert AmountTooLarge(amount);
        return uint128(amount);
    }
}
