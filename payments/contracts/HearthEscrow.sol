// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

import {IERC3009} from "./IERC3009.sol";

/// @title Hearth job escrow: a payer locks a job's price, the provider is paid against a validator receipt.
/// @notice A job is funded once (`fund` after an ERC-20 approve, or gas-free for the payer with an EIP-3009
/// authorization bound to the job's terms), then settles exactly once: `release` pays the provider what the
/// validator's EIP-712 receipt allows and returns the rest to the payer; `refund` returns everything to the
/// payer after the deadline, or earlier against a failing receipt.
/// Spending grants let an owner's agent fund jobs without the owner's key: the owner opens a grant for an agent
/// address with a per-job cap, a cap per fixed period and an expiry; the agent signs an EIP-712 `Spend` for one
/// job's terms and anyone submits `fundFromGrant`, which pulls the amount from the owner (who approved this
/// contract, or opened the grant with an EIP-2612 permit) into a job whose payer is the owner.
/// @dev A failing receipt (passed = false) carries amount = 0: nothing is payable to the provider.
/// A job is one storage slot: the hash of its terms (`termsHash`) with the job's `Status` in the last byte. Who
/// settles passes the terms back as calldata; they must hash to what was stored. Events carry every field.
contract HearthEscrow is ReentrancyGuard, EIP712 {
    using SafeERC20 for IERC20;

    /// @notice Where a job stands; `None` means the job id was never funded.
    enum Status {
        None,
        Open,
        Released,
        Refunded
    }

    /// @notice The terms a job was funded with: passed back to `release` and `refund`, checked by their hash.
    struct Terms {
        address payer;
        address provider;
        address validator;
        uint256 amount;
        uint64 deadline;
    }

    /// @notice A spending grant: who pays, who may spend, its caps and what the current period has spent.
    /// @dev Four slots; the last one (openedAt, period, spentInPeriod) is the only one a spend writes, and it is
    /// never zero once the grant is open, so a spend never pays for a fresh slot.
    struct Grant {
        address owner;
        uint64 periodSeconds;
        address agent;
        uint64 expiry;
        bool revoked;
        uint128 perJobMax;
        uint128 periodMax;
        uint64 openedAt;
        uint64 period;
        uint128 spentInPeriod;
    }

    /// @notice The EIP-712 type of a validator's receipt.
    bytes32 public constant RECEIPT_TYPEHASH =
        keccak256("Receipt(bytes32 jobId,bytes32 resultDigest,bool passed,uint256 amount,address provider)");

    /// @notice The EIP-712 type an agent signs to fund one job from a grant.
    bytes32 public constant SPEND_TYPEHASH = keccak256(
        "Spend(uint256 grantId,bytes32 jobId,address provider,address validator,uint256 amount,uint64 deadline)"
    );

    bytes32 private constant _HASH_MASK = ~bytes32(uint256(0xff));

    /// @notice The token every job is paid in (USDC or, on dev chains, TestUSDC).
    IERC20 public immutable token;

    /// @dev Every job ever funded, by id: `termsHash` of its terms with its `Status` in the last byte.
    mapping(bytes32 jobId => bytes32 entry) private _jobs;

    /// @notice How many grants were ever opened; grant ids run from 1 to this number.
    uint256 public grantCount;

    mapping(uint256 grantId => Grant) private _grants;

    event Funded(
        bytes32 indexed jobId,
        address indexed payer,
        address indexed provider,
        address validator,
        uint256 amount,
        uint64 deadline
    );
    event Released(
        bytes32 indexed jobId,
        address indexed provider,
        uint256 paid,
        uint256 refunded,
        bytes32 resultDigest
    );
    event Refunded(bytes32 indexed jobId, address indexed payer, uint256 amount, bytes32 resultDigest);
    event GrantOpened(
        uint256 indexed grantId,
        address indexed owner,
        address indexed agent,
        uint256 perJobMax,
        uint256 periodMax,
        uint64 periodSeconds,
        uint64 expiry
    );
    event GrantRevoked(uint256 indexed grantId);
    event GrantSpent(uint256 indexed grantId, bytes32 indexed jobId, uint256 amount, uint256 spentThisPeriod);

    /// @notice The job id was funded before.
    error JobExists(bytes32 jobId);
    /// @notice The job is not funded, or already settled.
    error JobNotOpen(bytes32 jobId);
    /// @notice The terms passed are not those the job was funded with.
    error TermsMismatch(bytes32 jobId);
    /// @notice A zero address, a zero amount or a deadline not in the future.
    error InvalidTerms();
    /// @notice The receipt asks to pay more than the job holds.
    error AmountExceedsFunded(uint256 amount, uint256 funded);
    /// @notice The receipt was not signed by the job's validator for these values.
    error InvalidReceipt(address signer);
    /// @notice A refund before the deadline needs a failing receipt.
    error DeadlineNotReached(uint64 deadline);
    error ZeroToken();
    /// @notice No grant has this id.
    error GrantUnknown(uint256 grantId);
    /// @notice The owner revoked the grant.
    error GrantRevokedError(uint256 grantId);
    /// @notice The grant's expiry has come.
    error GrantExpired(uint256 grantId, uint64 expiry);
    /// @notice The spend was not signed by the grant's agent for these terms.
    error NotGrantAgent(address signer, address agent);
    /// @notice The spend is above the grant's per-job cap.
    error OverJobCap(uint256 amount, uint256 perJobMax);
    /// @notice The spend is above what the grant's current period has left.
    error OverPeriodCap(uint256 amount, uint256 left);
    /// @notice Only the grant's owner may revoke it.
    error NotGrantOwner();
    /// @notice The permit failed and the allowance it was to give is not there either.
    error PermitFailed(uint256 allowance, uint256 permitValue);

    constructor(IERC20 token_) EIP712("HearthEscrow", "1") {
        if (address(token_) == address(0)) revert ZeroToken();
        token = token_;
    }

    /// @notice Funds `jobId` with `amount` the caller approved this contract to take.
    function fund(bytes32 jobId, address provider, address validator, uint256 amount, uint64 deadline)
        external
        nonReentrant
    {
        _open(jobId, msg.sender, provider, validator, amount, deadline);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Funds `jobId` from `payer` with an EIP-3009 ReceiveWithAuthorization whose nonce is
    /// `authorizationNonce(jobId, provider, validator, amount, deadline)`, so it pays for these terms only.
    function fundWithAuthorization(
        bytes32 jobId,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline,
        address payer,
        uint256 validAfter,
        uint256 validBefore,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant {
        _open(jobId, payer, provider, validator, amount, deadline);
        bytes32 nonce = authorizationNonce(jobId, provider, validator, amount, deadline);
        IERC3009(address(token)).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, v, r, s
        );
    }

    /// @notice Pays `amount` to the job's provider against the validator's passing receipt and returns the
    /// rest to the payer. Anyone may submit it: the receipt alone decides who gets what.
    /// `job` must be the terms the job was funded with.
    function release(
        bytes32 jobId,
        Terms calldata job,
        uint256 amount,
        bytes32 resultDigest,
        bytes calldata receiptSignature
    ) external nonReentrant {
        bytes32 hash = _openJob(jobId, job);
        uint256 funded = job.amount;
        if (amount > funded) revert AmountExceedsFunded(amount, funded);
        _checkReceipt(job, jobId, resultDigest, true, amount, receiptSignature);

        _jobs[jobId] = _entry(hash, Status.Released);
        uint256 remainder = funded - amount;
        emit Released(jobId, job.provider, amount, remainder, resultDigest);

        if (amount > 0) token.safeTransfer(job.provider, amount);
        if (remainder > 0) token.safeTransfer(job.payer, remainder);
    }

    /// @notice Returns the whole amount to the payer: by anyone once the deadline has passed (the receipt
    /// arguments are then ignored), or before it against the validator's failing receipt (amount 0).
    /// `job` must be the terms the job was funded with.
    function refund(bytes32 jobId, Terms calldata job, bytes32 resultDigest, bytes calldata receiptSignature)
        external
        nonReentrant
    {
        bytes32 hash = _openJob(jobId, job);
        if (block.timestamp <= job.deadline) {
            if (receiptSignature.length == 0) revert DeadlineNotReached(job.deadline);
            _checkReceipt(job, jobId, resultDigest, false, 0, receiptSignature);
        }

        _jobs[jobId] = _entry(hash, Status.Refunded);
        emit Refunded(jobId, job.payer, job.amount, resultDigest);

        token.safeTransfer(job.payer, job.amount);
    }

    /// @notice Opens a grant from the caller (its owner) to `agent`: each spend at most `perJobMax`, at most
    /// `periodMax` spent in each window of `periodSeconds` counted from now, spends accepted until `expiry`.
    /// The owner approves this contract to take what the agent will spend (or uses `openGrantWithPermit`).
    function openGrant(address agent, uint128 perJobMax, uint128 periodMax, uint64 periodSeconds, uint64 expiry)
        external
        nonReentrant
        returns (uint256 grantId)
    {
        return _openGrant(agent, perJobMax, periodMax, periodSeconds, expiry);
    }

    /// @notice `openGrant` and the owner's EIP-2612 permit giving this contract an allowance of `permitValue`,
    /// in one transaction. A permit already used (submitted by someone else first) does not stop the grant
    /// when the allowance it gave is there.
    function openGrantWithPermit(
        address agent,
        uint128 perJobMax,
        uint128 periodMax,
        uint64 periodSeconds,
        uint64 expiry,
        uint256 permitValue,
        uint256 permitDeadline,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external nonReentrant returns (uint256 grantId) {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), permitValue, permitDeadline, v, r, s) {}
        catch {
            uint256 allowance = token.allowance(msg.sender, address(this));
            if (allowance < permitValue) revert PermitFailed(allowance, permitValue);
        }
        return _openGrant(agent, perJobMax, periodMax, periodSeconds, expiry);
    }

    /// @notice Stops the grant for good: no spend from it is accepted afterwards. Jobs it funded stay as they are.
    function revokeGrant(uint256 grantId) external nonReentrant {
        Grant storage grant = _knownGrant(grantId);
        if (grant.owner != msg.sender) revert NotGrantOwner();
        if (grant.revoked) revert GrantRevokedError(grantId);
        grant.revoked = true;
        emit GrantRevoked(grantId);
    }

    /// @notice Funds `jobId` from the grant's owner against the agent's EIP-712 `Spend` of these terms, within
    /// the grant's caps. Anyone may submit it; the job's payer is the owner, so refunds go back to the owner.
    function fundFromGrant(
        uint256 grantId,
        bytes32 jobId,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline,
        bytes calldata spendSignature
    ) external nonReentrant {
        bytes32 digest = spendDigest(grantId, jobId, provider, validator, amount, deadline);
        address owner = _spend(grantId, jobId, amount, digest, spendSignature);
        _open(jobId, owner, provider, validator, amount, deadline);
        token.safeTransferFrom(owner, address(this), amount);
    }

    /// @notice A grant's terms and where its current period stands. `leftThisPeriod` is what a spend could take
    /// now: 0 once the grant is revoked or expired. `periodEnds` is when the current window closes.
    function grantOf(uint256 grantId)
        external
        view
        returns (
            address owner,
            address agent,
            uint256 perJobMax,
            uint256 periodMax,
            uint64 periodSeconds,
            uint64 expiry,
            bool revoked,
            uint256 spentThisPeriod,
            uint256 leftThisPeriod,
            uint64 periodEnds
        )
    {
        Grant storage grant = _knownGrant(grantId);
        owner = grant.owner;
        agent = grant.agent;
        perJobMax = grant.perJobMax;
        periodMax = grant.periodMax;
        periodSeconds = grant.periodSeconds;
        expiry = grant.expiry;
        revoked = grant.revoked;
        uint64 period = _periodIndex(grant);
        spentThisPeriod = period == grant.period ? grant.spentInPeriod : 0;
        if (!revoked && block.timestamp < expiry) leftThisPeriod = periodMax - spentThisPeriod;
        uint256 ends = uint256(grant.openedAt) + (uint256(period) + 1) * periodSeconds;
        periodEnds = ends > type(uint64).max ? type(uint64).max : uint64(ends);
    }

    /// @notice The EIP-712 digest an agent signs to fund one job from a grant (same domain as receipts).
    function spendDigest(
        uint256 grantId,
        bytes32 jobId,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline
    ) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(abi.encode(SPEND_TYPEHASH, grantId, jobId, provider, validator, amount, deadline))
        );
    }

    /// @notice Where job `jobId` stands and the hash of the terms it was funded with (`termsHash`; zero and
    /// `None` for an id never funded). A client checks a job holds its terms by comparing the hashes.
    function jobState(bytes32 jobId) external view returns (Status status, bytes32 termsHash_) {
        bytes32 entry = _jobs[jobId];
        return (Status(uint8(uint256(entry))), entry & _HASH_MASK);
    }

    /// @notice The hash a job's entry keeps of its terms: keccak256 of their ABI encoding, last byte zeroed (the
    /// entry keeps the job's `Status` there).
    function termsHash(address payer, address provider, address validator, uint256 amount, uint64 deadline)
        public
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(payer, provider, validator, amount, deadline)) & _HASH_MASK;
    }

    /// @notice The EIP-3009 nonce that binds a payer's authorization to one job's terms.
    function authorizationNonce(
        bytes32 jobId,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline
    ) public pure returns (bytes32) {
        return keccak256(abi.encode(jobId, provider, validator, amount, deadline));
    }

    /// @notice The EIP-712 digest a validator signs for a receipt (lets clients check before submitting).
    function receiptDigest(bytes32 jobId, bytes32 resultDigest, bool passed, uint256 amount, address provider)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(RECEIPT_TYPEHASH, jobId, resultDigest, passed, amount, provider)));
    }

    /// @notice The EIP-712 domain separator (chain id and this contract's address included).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _open(
        bytes32 jobId,
        address payer,
        address provider,
        address validator,
        uint256 amount,
        uint64 deadline
    ) private {
        if (_jobs[jobId] != 0) revert JobExists(jobId);
        if (provider == address(0) || validator == address(0) || amount == 0 || deadline <= block.timestamp) {
            revert InvalidTerms();
        }
        _jobs[jobId] = _entry(termsHash(payer, provider, validator, amount, deadline), Status.Open);
        emit Funded(jobId, payer, provider, validator, amount, deadline);
    }

    function _openGrant(address agent, uint128 perJobMax, uint128 periodMax, uint64 periodSeconds, uint64 expiry)
        private
        returns (uint256 grantId)
    {
        if (
            agent == address(0) || perJobMax == 0 || periodMax == 0 || periodSeconds == 0
                || expiry <= block.timestamp
        ) revert InvalidTerms();
        grantId = ++grantCount;
        _grants[grantId] = Grant({
            owner: msg.sender,
            periodSeconds: periodSeconds,
            agent: agent,
            expiry: expiry,
            revoked: false,
            perJobMax: perJobMax,
            periodMax: periodMax,
            openedAt: uint64(block.timestamp),
            period: 0,
            spentInPeriod: 0
        });
        emit GrantOpened(grantId, msg.sender, agent, perJobMax, periodMax, periodSeconds, expiry);
    }

    /// @dev Checks a spend of `amount` against the grant (state, agent's signature of `digest`, caps), counts
    /// it in the current period and returns the owner who pays.
    function _spend(uint256 grantId, bytes32 jobId, uint256 amount, bytes32 digest, bytes calldata signature)
        private
        returns (address owner)
    {
        Grant storage grant = _knownGrant(grantId);
        if (grant.revoked) revert GrantRevokedError(grantId);
        if (block.timestamp >= grant.expiry) revert GrantExpired(grantId, grant.expiry);
        _checkAgent(grant.agent, digest, signature);
        emit GrantSpent(grantId, jobId, amount, _count(grant, amount));
        return grant.owner;
    }

    function _checkAgent(address agent, bytes32 digest, bytes calldata signature) private pure {
        (address signer, ECDSA.RecoverError err, ) = ECDSA.tryRecover(digest, signature);
        if (err != ECDSA.RecoverError.NoError || signer != agent) revert NotGrantAgent(signer, agent);
    }

    /// @dev Adds `amount` to what the grant's current period has spent, within both caps; returns the new sum.
    function _count(Grant storage grant, uint256 amount) private returns (uint256 spent) {
        uint256 perJobMax = grant.perJobMax;
        if (amount > perJobMax) revert OverJobCap(amount, perJobMax);
        uint64 period = _periodIndex(grant);
        spent = period == grant.period ? grant.spentInPeriod : 0;
        uint256 left = grant.periodMax - spent; // spent never exceeds periodMax
        if (amount > left) revert OverPeriodCap(amount, left);
        spent += amount; // <= periodMax, so it fits a uint128
        grant.period = period;
        grant.spentInPeriod = uint128(spent);
    }

    function _knownGrant(uint256 grantId) private view returns (Grant storage grant) {
        grant = _grants[grantId];
        if (grant.owner == address(0)) revert GrantUnknown(grantId);
    }

    /// @dev The index of the fixed window of `periodSeconds` (counted from the grant's opening) now falls in.
    function _periodIndex(Grant storage grant) private view returns (uint64) {
        return uint64((block.timestamp - grant.openedAt) / grant.periodSeconds);
    }

    /// @dev The hash of an open job's terms; reverts unless the job is open and `job` are its terms.
    function _openJob(bytes32 jobId, Terms calldata job) private view returns (bytes32 hash) {
        bytes32 entry = _jobs[jobId];
        if (uint8(uint256(entry)) != uint8(Status.Open)) revert JobNotOpen(jobId);
        hash = entry & _HASH_MASK;
        if (termsHash(job.payer, job.provider, job.validator, job.amount, job.deadline) != hash) {
            revert TermsMismatch(jobId);
        }
    }

    function _entry(bytes32 hash, Status status) private pure returns (bytes32) {
        return hash | bytes32(uint256(status));
    }

    function _checkReceipt(
        Terms calldata job,
        bytes32 jobId,
        bytes32 resultDigest,
        bool passed,
        uint256 amount,
        bytes calldata signature
    ) private view {
        bytes32 digest = receiptDigest(jobId, resultDigest, passed, amount, job.provider);
        (address signer, ECDSA.RecoverError err, ) = ECDSA.tryRecover(digest, signature);
        if (err != ECDSA.RecoverError.NoError || signer != job.validator) revert InvalidReceipt(signer);
    }
}
